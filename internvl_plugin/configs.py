def register_configs():
    pass
