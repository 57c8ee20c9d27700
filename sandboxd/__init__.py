"""sandboxd: isolated services on one Linux host, with sockets bound by sandboxd and passed in."""

__version__ = "0.1.0"
