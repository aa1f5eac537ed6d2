"""Pure tensor functions: advantages, losses, corrections and mismatch metrics."""
