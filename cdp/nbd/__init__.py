"""NBD: the wire protocol (proto.py, pure), the export server (server.py), a small client."""
