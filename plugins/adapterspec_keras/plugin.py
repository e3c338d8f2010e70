"""Hook implementations of the keras backend (work in progress)."""
