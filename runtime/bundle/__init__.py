"""The ``.edgepack`` bundle: the archive reader/writer (archive.py), the manifest schema
(manifest.py) and Ed25519 signatures (signing.py)."""
