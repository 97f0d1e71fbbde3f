"""Tasks (problems, reference solutions, graders, tokenizers) and the checkpointable prompt iterator."""
