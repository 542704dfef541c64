"""Image signature service: the deep global descriptor, the colour-texture bag of words, and the salient
objects of a photo (LocateObjects)."""
