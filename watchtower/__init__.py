"""optichannel watchtower: third-party dispute responder (see DESIGN.md section 7; not built yet)."""
