from .reconstruction import reconstruction_loss

__all__ = ["reconstruction_loss"]
