"""Evaluation: word error rate (`wer`: normalisation and alignment; `references`: where references come
from; `scoring`: wer.json and its command line)."""
