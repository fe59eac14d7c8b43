"""Training, model loading, export, sampling and the command line."""
