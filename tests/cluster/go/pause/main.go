// Command pause is the real node's pod sandbox process (the "pause" container that holds a
// pod's namespaces). No registry is reachable here, so the test cluster builds its own
// sandbox image from this program: it sleeps until SIGTERM or SIGINT and reaps orphaned
// children, which is all a sandbox's init process does.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	children := make(chan os.Signal, 8)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
