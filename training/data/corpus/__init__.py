"""The embedded corpus (`README.md`): `austen.jsonl.xz`, rebuilt by `build.py`."""
