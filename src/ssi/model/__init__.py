"""Llama 3.x models from HF directories: the architecture read from config.json (`architecture`), the
torchtune model built from it (`builder`), and the checkpointer that reads and writes complete HF model
directories (`checkpointer`)."""
