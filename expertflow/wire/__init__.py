"""HOW bytes cross machines, the part both ends share: the wire protocol, the client, and CurveZMQ key files."""
