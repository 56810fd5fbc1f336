"""Hardware profiles shipped with SpecOffload (spec-sheet presets and measured profiles)."""
