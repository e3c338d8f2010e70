"""adapterspec's torch backend (work in progress)."""
