"""Offline jobs: data, training loops, evaluation, reports, saving to the model store."""
