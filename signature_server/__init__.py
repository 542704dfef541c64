"""Image signature service: the deep global descriptor (and, later, the colour-texture bag of words)."""
