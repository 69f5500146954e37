"""The run spec: one YAML file drives every backend; its sections, YAML with line numbers, input checks."""
