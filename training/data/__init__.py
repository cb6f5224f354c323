"""Datasets for the training jobs: generated locally or read from the user's files."""
