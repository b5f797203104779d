"""kvmsim.scenarios"""
