"""Test helpers: real servers started on free loopback ports, and paths to the shared data."""
