from kvmsim.kvm.memslot import KVM_MEM

LOG = int(KVM_MEM.LOG_DIRTY_PAGES)
