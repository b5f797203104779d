"""kvmsim.x86"""
