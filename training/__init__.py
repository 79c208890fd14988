"""Quaver training pipeline: data, IVON fine-tuning, export, evaluation."""
