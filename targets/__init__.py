"""Target descriptors shipped with qcompile: one TOML file per target (see qcompile.target)."""
