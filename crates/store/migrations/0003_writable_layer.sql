-- Cubicle store, schema version 3: the writable-layer limit of sandboxes and snapshots.
--
-- Never edit a migration that has shipped: add the next numbered file instead.

-- The size limit of a sandbox's writable layer in MiB (a template's
-- `--writable-layer-size`), NULL for none. Kept with the sandbox (a hibernated sandbox
-- wakes with it) and with each snapshot (what is restored from it keeps it).
ALTER TABLE sandboxes ADD COLUMN writable_layer_mib INTEGER
    CHECK (writable_layer_mib IS NULL OR writable_layer_mib > 0);
ALTER TABLE snapshots ADD COLUMN writable_layer_mib INTEGER
    CHECK (writable_layer_mib IS NULL OR writable_layer_mib > 0);
