"""Config files: each module's get_config(arg) returns an ml_collections.ConfigDict."""
