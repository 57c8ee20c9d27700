"""The store: images, OCI import and named volumes under /var/lib/sandboxd."""
