"""The knnlm command-line interface."""
