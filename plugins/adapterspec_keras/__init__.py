"""adapterspec's keras backend (work in progress)."""
