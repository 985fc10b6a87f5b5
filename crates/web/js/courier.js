// Courier browser client: see ../PROTOCOL.md (being written).
