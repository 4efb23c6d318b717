"""optichannel watchtower: the third-party dispute responder (DESIGN.md section 7).

Not built yet."""
