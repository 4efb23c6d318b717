"""optichannel core: states, signatures, wire, update machine, store, transport, client."""
