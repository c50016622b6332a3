"""CALD distillation: losses, guidance schedules, XATL freezing."""
