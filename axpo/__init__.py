"""AXPO: Agent eXplorative Policy Optimization for tool-using vision-language agents."""

__version__ = "0.1.0"
