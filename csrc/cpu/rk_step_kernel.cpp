// CPU kernels of the Runge–Kutta step's arithmetic (dcn_fast/solver.py): every
// stage input, solution, dense output and backward accumulation is one linear
// combination of whole states, and the error ratio one reduction, each in a
// single pass over memory (torchdiffeq forms each as a full-size temporary and
// a strided reduction over a trailing stage dimension).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace dcn_fast {
namespace {

// Elements per block: a block of every operand stays in L1 while its terms are summed.
constexpr int64_t kBlock = 1024;

// The coefficients as doubles: coeffs is a float64 [len(terms)] tensor (a device tensor
// in the sync-free solve, a host one here).
std::vector<double> check_terms(const char* op, const at::Tensor& like, at::TensorList terms,
                                const at::Tensor& coeffs) {
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == static_cast<int64_t>(terms.size()) &&
                  coeffs.scalar_type() == at::kDouble && coeffs.device().is_cpu(),
              op, ": coeffs must be a float64 CPU tensor [", terms.size(), "], got ", coeffs.sizes(), " ",
              coeffs.scalar_type());
  for (const at::Tensor& t : terms) {
    TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() && t.is_contiguous(), op,
                ": every term must be a contiguous tensor shaped and typed like the first, got ", t.sizes(), " ",
                t.scalar_type());
  }
  const at::Tensor c = coeffs.contiguous();
  return std::vector<double>(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel());
}

// out = base + Σ_j coeffs[j]·terms[j]  (base absent: 0), in the terms' dtype, as
// the solver computes with a float32 state.
at::Tensor rk_combine_cpu(const c10::optional<at::Tensor>& base, at::TensorList terms, const at::Tensor& coeffs_in) {
  TORCH_CHECK(!terms.empty() || base.has_value(), "rk_combine: needs a base or at least one term");
  const at::Tensor like = base.has_value() ? base->contiguous() : terms[0];
  const std::vector<double> coeffs = check_terms("rk_combine", like, terms, coeffs_in);
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
  const int64_t n = like.numel();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "rk_combine_cpu", [&] {
    std::vector<const scalar_t*> src;
    std::vector<scalar_t> c;
    for (size_t j = 0; j < terms.size(); ++j) {
      src.push_back(terms[j].const_data_ptr<scalar_t>());
      c.push_back(static_cast<scalar_t>(coeffs[j]));
    }
    const scalar_t* b = base.has_value() ? like.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kBlock * 4, [&](int64_t begin, int64_t end) {
      for (int64_t lo = begin; lo < end; lo += kBlock) {
        const int64_t hi = std::min(lo + kBlock, end);
        if (b != nullptr) {
          for (int64_t e = lo; e < hi; ++e) o[e] = b[e];
        } else {
          for (int64_t e = lo; e < hi; ++e) o[e] = scalar_t(0);
        }
        for (size_t j = 0; j < src.size(); ++j) {
          const scalar_t cj = c[j];
          const scalar_t* s = src[j];
          for (int64_t e = lo; e < hi; ++e) o[e] += cj * s[e];
        }
      }
    });
  });
  return out;
}

// sqrt(mean_e (err_e / (atol + rtol·max(|y0_e|, |y1_e|)))²) with err = Σ_j coeffs[j]·terms[j]:
// torchdiffeq's RMS error ratio, without the error estimate ever reaching memory.
// Partial sums in double over fixed chunks, summed in chunk order: the same
// result whatever the thread count. Returned as a 0-d double tensor.
at::Tensor rk_error_ratio_cpu(const at::Tensor& y0_in, const at::Tensor& y1_in, at::TensorList terms,
                              const at::Tensor& coeffs_in, double rtol, double atol) {
  const at::Tensor y0 = y0_in.contiguous(), y1 = y1_in.contiguous();
  TORCH_CHECK(y0.sizes() == y1.sizes() && y0.scalar_type() == y1.scalar_type(),
              "rk_error_ratio: y0 and y1 must match, got ", y0.sizes(), " and ", y1.sizes());
  const std::vector<double> coeffs = check_terms("rk_error_ratio", y0, terms, coeffs_in);
  const int64_t n = y0.numel();
  TORCH_CHECK(n > 0, "rk_error_ratio: the state is empty");
  const int64_t chunks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(y0.scalar_type(), "rk_error_ratio_cpu", [&] {
    std::vector<const scalar_t*> src;
    std::vector<scalar_t> c;
    for (size_t j = 0; j < terms.size(); ++j) {
      src.push_back(terms[j].const_data_ptr<scalar_t>());
      c.push_back(static_cast<scalar_t>(coeffs[j]));
    }
    const scalar_t* a = y0.const_data_ptr<scalar_t>();
    const scalar_t* b = y1.const_data_ptr<scalar_t>();
    // Tolerances in the state's dtype, as torchdiffeq's tensors promote them.
    const scalar_t r = static_cast<scalar_t>(rtol), at_ = static_cast<scalar_t>(atol);
    at::parallel_for(0, chunks, 4, [&](int64_t begin, int64_t end) {
      scalar_t err[kBlock];
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t lo = chunk * kBlock, hi = std::min(lo + kBlock, n), len = hi - lo;
        for (int64_t e = 0; e < len; ++e) err[e] = scalar_t(0);
        for (size_t j = 0; j < src.size(); ++j) {
          const scalar_t cj = c[j];
          const scalar_t* s = src[j] + lo;
          for (int64_t e = 0; e < len; ++e) err[e] += cj * s[e];
        }
        double sum = 0.0;
        for (int64_t e = 0; e < len; ++e) {
          const scalar_t tol = at_ + r * std::max(std::abs(a[lo + e]), std::abs(b[lo + e]));
          const double q = static_cast<double>(err[e] / tol);
          sum += q * q;
        }
        partial[chunk] = sum;
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(std::sqrt(total / static_cast<double>(n)), y0.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_fast, CPU, m) {
  m.impl("rk_combine", &rk_combine_cpu);
  m.impl("rk_error_ratio", &rk_error_ratio_cpu);
}

}  // namespace dcn_fast
