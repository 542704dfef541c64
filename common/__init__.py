"""Plumbing shared by every service: typed configuration, server bootstrap, image decoding."""
