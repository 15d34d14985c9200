"""Ferry services: each one a process of its own; they share only ferry.core."""
