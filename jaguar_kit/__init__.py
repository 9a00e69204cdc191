"""jaguar_kit: animal re-identification for Kaggle's jaguar-re-id and camera-trap collections."""

__version__ = "0.1.0"
