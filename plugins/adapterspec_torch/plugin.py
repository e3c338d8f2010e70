"""Hook implementations of the torch backend (work in progress)."""
