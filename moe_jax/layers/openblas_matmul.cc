// The "openblas" grouped matmul of moe_jax.layers.dispatch: an XLA FFI custom call (CPU) that
// multiplies each expert's rows by its kernel with single-threaded OpenBLAS sgemm calls over the
// EXACT row ranges (no padding, mask or copy), split into chunks that XLA's intra-op thread pool
// and the calling thread take in turn. Built on first use by moe_jax/layers/openblas_matmul.py.
//
// Rows come in S = E * n segments, segment s belonging to expert s / n: with attribute
// "stride" = 0 they are back to back (rows sorted by expert, unpadded: segment s starts where
// s - 1 ends), with stride > 0 segment s starts at row s * stride (capacity buffers [E, G, C]:
// stride C, n = G) and takes its first sizes[s] rows; segments are clipped to the R rows.
// Modes (attribute "mode"):
//   0 (forward):  out[R, O]    = a[R, I] @ b[E, I, O] by segment; every other row gets 0.
//   1 (dx):       out[R, I]    = a[R, O] @ b[E, I, O]^T by segment; every other row gets 0.
//   2 (dW):       out[E, I, O] = a[R, I]^T @ b[R, O] summed over each expert's segments' rows;
//                 0 for an expert with no rows.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
// scipy-openblas64: ILP64 (64-bit integers), symbols prefixed "scipy_" and suffixed "64_".
void scipy_cblas_sgemm64_(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                          float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                          float beta, float* c, int64_t ldc);
void scipy_openblas_set_num_threads64_(int num_threads);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Rows per chunk (modes 0, 1) and output elements per chunk (mode 2, whole rows of an expert's
// [I, O] gradient): large enough for sgemm to run near its peak, small enough that an expert's
// work splits over the threads.
constexpr int64_t kChunkRows = 256, kChunkElements = 512 * 512;
#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23  // Linux >= 5.14; older kernels refuse it and fault as usual
#endif

struct Chunk {
  // Modes 0, 1: rows [begin, begin + count) of a and the output, multiplied by the expert's
  // kernel, or (zeros) rows of the output outside every segment, set to 0. Mode 2: rows
  // [begin, begin + count) of the expert's [I, O] gradient.
  int64_t expert, begin, count;
  bool zeros;
};

// Faults in a chunk's output pages in one call before sgemm writes them: outputs are fresh
// memory at every step (glibc maps large blocks anew), and page by page that is up to half of
// a weight gradient's time at E=128. Each thread does its own chunks, so it stays parallel.
void Populate(float* data, int64_t elements) {
#ifdef MADV_POPULATE_WRITE
  static const uintptr_t kPage = sysconf(_SC_PAGESIZE);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kPage - 1) & ~(kPage - 1);
  const uintptr_t hi = (begin + sizeof(float) * elements) & ~(kPage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#endif
}

// Shared by the calling thread and the pool's helpers; a helper that starts after the last
// chunk was taken finds nothing to do, so the caller never waits for a task that has not begun.
struct Work {
  std::vector<int64_t> start, rows;  // each segment's first row and row count
  std::vector<Chunk> chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> out,
                         int32_t mode, int64_t stride) {
  static const bool single_threaded = (scipy_openblas_set_num_threads64_(1), true);
  (void)single_threaded;  // the threads are XLA's: OpenBLAS's own pool would compete for cores
  if (mode < 0 || mode > 2) return ffi::Error::InvalidArgument("mode must be 0, 1 or 2");
  if (stride < 0) return ffi::Error::InvalidArgument("stride must be >= 0");
  const auto a_dims = a.dimensions(), b_dims = b.dimensions();
  const int64_t num_experts = mode == 2 ? out->dimensions()[0] : b_dims[0];
  const int64_t num_segments = sizes.element_count(), num_rows = a_dims[0];
  if (num_experts == 0 || num_segments % num_experts != 0)
    return ffi::Error::InvalidArgument("the segments must be a multiple of the experts");
  const int64_t per_expert = num_segments / num_experts;
  const int64_t in_dim = mode == 2 ? a_dims[1] : b_dims[1];
  const int64_t out_dim = mode == 2 ? b_dims[1] : b_dims[2];
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = out->typed_data();

  auto work = std::make_shared<Work>();
  int64_t end = 0;  // of the previous segment
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t start = std::min(stride > 0 ? s * stride : end, num_rows);
    const int64_t room = stride > 0 ? std::min(stride, num_rows - start) : num_rows - start;
    work->start.push_back(start);
    work->rows.push_back(std::clamp<int64_t>(sizes.typed_data()[s], 0, room));
    end = start + work->rows.back();
  }
  auto chunk_rows = [&](int64_t expert, int64_t begin, int64_t stop, int64_t step, bool zeros) {
    for (int64_t row = begin; row < stop; row += step)
      work->chunks.push_back({expert, row, std::min(step, stop - row), zeros});
  };
  if (mode == 2) {
    const int64_t step = std::max<int64_t>(1, kChunkElements / out_dim);
    for (int64_t e = 0; e < num_experts; ++e) chunk_rows(e, 0, in_dim, step, false);
  } else {
    for (int64_t s = 0; s < num_segments; ++s) {
      const int64_t begin = work->start[s], filled = begin + work->rows[s];
      const int64_t next = s + 1 < num_segments ? work->start[s + 1] : num_rows;
      chunk_rows(s / per_expert, begin, filled, kChunkRows, false);
      chunk_rows(s / per_expert, filled, std::max(filled, next), kChunkRows, true);
    }
  }

  const int64_t total = work->chunks.size();
  auto run = [work, total, mode, per_expert, in_dim, out_dim, A, B, C] {
    for (int64_t i; (i = work->next.fetch_add(1)) < total;) {
      const Chunk& c = work->chunks[i];
      const float* w = B + c.expert * in_dim * out_dim;
      if (mode != 2) {
        const int64_t width = mode == 0 ? out_dim : in_dim;
        float* y = C + c.begin * width;
        Populate(y, c.count * width);
        if (c.zeros) {
          std::memset(y, 0, sizeof(float) * c.count * width);
        } else if (mode == 0) {
          scipy_cblas_sgemm64_(kRowMajor, kNoTrans, kNoTrans, c.count, out_dim, in_dim, 1.f,
                               A + c.begin * in_dim, in_dim, w, out_dim, 0.f, y, out_dim);
        } else {
          scipy_cblas_sgemm64_(kRowMajor, kNoTrans, kTrans, c.count, in_dim, out_dim, 1.f,
                               A + c.begin * out_dim, out_dim, w, out_dim, 0.f, y, in_dim);
        }
      } else {
        float* dw = C + (c.expert * in_dim + c.begin) * out_dim;  // contiguous rows of I
        Populate(dw, c.count * out_dim);
        float beta = 0.f;  // the expert's first segment with rows writes, later ones add
        for (int64_t s = c.expert * per_expert; s < (c.expert + 1) * per_expert; ++s) {
          const int64_t row = work->start[s], rows = work->rows[s];
          if (rows == 0) continue;
          scipy_cblas_sgemm64_(kRowMajor, kTrans, kNoTrans, c.count, out_dim, rows, 1.f,
                               A + row * in_dim + c.begin, in_dim, B + row * out_dim, out_dim,
                               beta, dw, out_dim);
          beta = 1.f;
        }
        if (beta == 0.f) std::memset(dw, 0, sizeof(float) * c.count * out_dim);
      }
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([run] { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("mode")
                                  .Attr<int64_t>("stride"));
