"""kvmsim.mm"""
