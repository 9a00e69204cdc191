"""An ecologist's own photos: which known individual is this, or is it a new one?

The modules follow the photos' path (each imports only those before it)::

    names        one spelling per individual's name; names made safe as paths
    inputs       read folders / CSVs of photos, prepare them once, keyed by content
    detections   whole camera-trap frames: one photo per animal box of MegaDetector's output
    model        the embedding model and the embeddings of photos
    coat         coat-pattern evidence: keypoints matched against every catalogue photo at once
    calibration  scores per individual, with the coat pattern, and the calibrated `new` decision
    catalogue    a folder of known individuals' embeddings and its calibration
    identify     top-k individuals, probabilities and a decision per photo
    cluster      groups of unlabelled photos, attached to known individuals
    folders      a folder per group (links or copies), rewritten safely by its manifest
    report       report.html, the page a person reviews
    review       apply the decisions.csv that page exports to a catalogue (history.jsonl)
    evaluate     open-set figures on an identity-disjoint split
"""
