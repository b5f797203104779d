"""kvmsim.backend"""
