"""Bytes on a socket: the zero-copy socket channel, its error-queue accounting and flush.

It knows bytes, not pages or packets: nothing here imports multifd/ or migrate/.
"""
