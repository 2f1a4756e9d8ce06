"""How calls and values become bytes and digests, with no I/O and no caches.

``digest`` (keys), ``paths`` (``Path`` arguments keyed by content),
``values`` (value blobs: encoding, streaming, verifying), ``plain`` (the
restricted pickling of records and requests), ``peek`` (reading argument
pickles for display without importing anything) and ``canonical`` (the
bytes a signature covers). Everything above this package imports from it;
it imports nothing above it but ``errors``.
"""
