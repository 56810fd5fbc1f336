"""Planning and simulation for SpecOffload: pure Python, never imports torch."""
