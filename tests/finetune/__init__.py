"""Tests of the finetune package (training, evaluation)."""
