"""Coverage-guided fuzz harnesses (atheris) for the wire decoder and the session; see README.md."""
