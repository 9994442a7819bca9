"""Runtime backends: one protocol (base.py), one short file per backend."""
