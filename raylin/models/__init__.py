"""Teacher families, mixers, plans and the student model."""
