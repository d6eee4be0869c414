"""The chaos harness: many uploads under faults on every leg, each verified byte for byte."""

__all__: list[str] = []
