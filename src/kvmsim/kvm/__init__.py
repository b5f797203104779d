"""kvmsim.kvm"""
